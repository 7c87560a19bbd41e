"""Operational tools of the recipe that are neither stages nor library (``make drill``)."""
