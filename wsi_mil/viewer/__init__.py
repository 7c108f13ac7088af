"""``wsi-mil view``: a study's slides and heatmaps in the browser (Starlette + OpenSeadragon).

:mod:`.study` reads the output folder through the layout, :mod:`.tiles` renders slide, heatmap and contour
tiles, :mod:`.app` serves them and the pages in ``static/``. The viewer imports no stage and writes nothing
into the study: its tile cache lives in memory.
"""
