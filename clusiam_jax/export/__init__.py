"""Export: a run's weights over a patch source, and everything written from it.

  run.py (the action), embed.py (the loop), format.py (the layout: the only owner),
  maps.py (cluster maps), qupath.py (QuPath tiles), atlas.py, palette.py (their colors)
"""
