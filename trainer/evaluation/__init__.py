"""Scoring, shared by the families: the COCO-WholeBody evaluator (six passes, rescoring, OKS-NMS), its
array COCOeval, percent units, a model evaluated on a data set, and drawing keypoints."""
