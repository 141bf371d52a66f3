"""Compiler and launch settings, in one place (never hard-coded per kernel)."""
import os

# NaN and inf must keep their meaning, so no 'nnan'/'ninf'. 'reassoc' lets LLVM vectorize the
# float64 reductions; each channel is still reduced in one fixed order, so results are
# deterministic and do not depend on the thread count.
FASTMATH = frozenset({"nsz", "arcp", "contract", "reassoc"})

JIT_OPTIONS = dict(cache=os.environ.get("FASTBN_NO_CACHE", "") == "", nogil=True,
                   fastmath=set(FASTMATH), error_model="numpy", boundscheck=False)

# Tensors with fewer elements than this run the serial kernels: waking the thread pool costs
# more than the work.
CPU_PARALLEL_MIN_SIZE = int(os.environ.get("FASTBN_CPU_PARALLEL_MIN_SIZE", 1 << 15))

# Channels-last (inner == 1) reductions split rows into chunks of about this many elements.
# The chunking is fixed by the shape alone, so results do not depend on the thread count.
CPU_CHUNK_ELEMENTS = 1 << 14
