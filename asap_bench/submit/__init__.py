"""Submitting an encoder: a validated result bundle out of a card and a checkpoint, and the leaderboard it joins.

``submission`` checks a card and its checkpoint, runs a smoke forward and the
protocols through the runner, and writes a bundle (``bundle``); ``verify``
decides whether a bundle can be trusted; ``leaderboard`` merges verified bundles
into ``results/leaderboard`` and ranks them with the statistics module.
"""
