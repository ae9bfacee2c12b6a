"""Image data: the sources `prepare` reads, the fixed class-stratified splits and draws, and sample grids."""
