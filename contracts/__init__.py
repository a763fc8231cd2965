"""blendsm.contracts."""
