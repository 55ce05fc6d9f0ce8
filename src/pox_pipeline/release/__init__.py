"""Choosing the champion and publishing it: registry, guard, backends, monitoring reference, card,
BentoML store.
"""
