"""What every experiment script shares: run folder, tracking, held-out evaluation, curves and sample grids."""
