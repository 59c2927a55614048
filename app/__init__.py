"""The application layer: what the top-level scripts drive -- the whole chain (`pipeline`), the
hyper-parameter sweep (`sweep`), the Grad-CAM inspection (`visualize`) and the data step
(`data_install`). It sits above `analysis` (the report) and `engine` (the phases), which import
nothing from it."""
