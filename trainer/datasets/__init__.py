"""The data every family reads: COCO-WholeBody annotation files and their per-node cache, the keypoint
definitions, where a run's data come from (real or synthetic), and what every family's data set shares."""
