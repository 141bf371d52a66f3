"""Public helpers of the cuda backend (``import fastbn.cuda``; ``import fastbn`` never loads it).

``nonfinite_channels()``
    Where the cpu backend warns (a channel whose new running statistics would not be finite in
    their dtype keeps its old ones), the cuda backend records the channels on the device, with
    no host wait. This reads the record of the most recent running-statistics update made by
    this thread (waiting for it to finish).
``current_stream(arrays=(), stream=None)``
    The stream fastbn launches on: ``stream``, else the public call's ``stream=``, else the
    stream the inputs name (PyTorch: ``torch.cuda.current_stream()``; ``__cuda_array_interface__``
    v3 'stream'), else numba's default stream.
``call_scope(stream=None)``
    The context of one public call: its launch stream, its array library (PyTorch in, PyTorch
    out), the check that arguments come from one library. The API opens one per call.
``precompile(dtypes=...)``
    Compile the common kernel signatures ahead of the first call (see docs/cuda.md).

Importing this module imports numba-cuda (an ImportError saying how to install it when missing)
but touches no GPU until a function is called.
"""
from .backends.cuda import (call_scope, current_stream, nonfinite_channels,  # noqa: F401
                            precompile, result)

__all__ = ["nonfinite_channels", "current_stream", "call_scope", "precompile", "result"]
