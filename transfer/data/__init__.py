"""Transfer datasets: readers of the standard on-disk layouts and small synthetic generators."""
