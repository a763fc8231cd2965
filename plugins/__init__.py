"""blendsm.plugins."""
