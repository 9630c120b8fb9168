"""Export: a checkpoint to an engine directory of ONNX graphs, validated against PyTorch (torch + onnx; imported
only by the export and benchmark tools, never by the runtime).

    specs.py          what is exported: one GraphSpec per graph (module, I/O names, fixed-seed inputs)
    ties.py           validation mismatches that are exact ties
    onnx_graph.py     torch.onnx export of one graph and its structural checks
    validation.py     ONNX Runtime vs PyTorch (fp32) or vs the fp32 graph (fp16, int8): figures and tolerances
    precision.py      the fp16 graphs and the int8 prior
    directory.py      the engine directory on disk: atomic swap, TensorRT engines carried over
    pipeline.py       export_engine_dir: all of the above, in order, and the manifest
    tensorrt_lint.py  would TensorRT's ONNX parser accept a graph? (onnx only, no torch: build_trt.py runs it too)
    tensorrt_ops.py   the parser's operator/type table the lint checks against

The command line is export/to_onnx.py.
"""
