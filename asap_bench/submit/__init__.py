"""Submitting an encoder: a validated result bundle out of a card and a checkpoint, and the leaderboard it joins.

``submission`` checks a card and its checkpoint, runs a smoke forward and the
protocols through the runner, and writes a bundle (``bundle``); ``verify``
decides whether a bundle is intact and self-consistent, and ``rerun`` whether
some of its jobs give the same numbers when run again here; ``leaderboard``
merges verified bundles into ``results/leaderboard`` and ranks them with the
statistics module.
"""
