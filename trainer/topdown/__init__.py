"""The top-down heatmap family (``family: topdown_heatmap``): HRNet on person crops, DARK heatmaps, and the
FoWKAL loss family (MSE, AWing, KAL, WAHR/FWAHR weighting). ``family.py`` is what the shared code asks."""
