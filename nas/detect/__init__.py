"""Object detection: YOLO-format data, detector model, loss, training and evaluation."""
