"""blendsm.broker."""
