"""Building blocks of ``distseg predict``: window geometry, raster readers, the streaming
sliding-window engine, output writers and area summaries. The public entry points are in
:mod:`distseg.predict`."""
