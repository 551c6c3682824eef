"""Domain adaptation to a target cell type: the control shift, its files, target prediction and scoring."""
