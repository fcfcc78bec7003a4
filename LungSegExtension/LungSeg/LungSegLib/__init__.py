"""LungSeg module internals, one file per job: InstallLogic (dependencies), Parameter (parameter node),
SegmentationLogic (the computation), BatchProcess (the folder run) and Widget (the panel)."""
