"""Reading searches back: fronts and picks, figures, TensorBoard, run folders, comparisons of trained detectors."""
