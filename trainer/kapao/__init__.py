"""KAPAO (``family: kapao``): keypoints and poses as objects (McNally et al., ECCV 2022), whole-body
(K = 133) and COCO body (K = 17).

A single-stage YOLOv5-P6 detector without heatmaps: pose objects (a person box + K keypoints) and keypoint
objects (a small box per keypoint, one class per keypoint type), fused at inference.
"""
