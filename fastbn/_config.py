"""Compiler and launch settings, in one place (never hard-coded per kernel)."""
import os

# Fast-math flags of the cpu kernels that reduce: 'reassoc' alone, which LLVM needs to vectorize
# the float64 sums. Each channel is still reduced in one fixed order of compiled code, so results
# are deterministic. No other flag: 'contract' (FMA), 'arcp' and 'nsz' change values too, and
# elementwise-only kernels are strict IEEE, so a loop's vector body, its scalar remainder and
# the alias-checked fallback LLVM emits for in-place calls give the same bits (issue 13.1).
CPU_REDUCTION_FASTMATH = frozenset({"reassoc"})

CPU_JIT_OPTIONS = dict(cache=os.environ.get("FASTBN_NO_CACHE", "") == "", nogil=True,
                       error_model="numpy", boundscheck=False)

# Tensors with fewer elements than this run in the calling thread: handing tasks to the thread
# pool costs more than the work. One hand-off (a pass split over the pool's Python threads)
# costs about 60 us on a 2-core VM (an empty kernel's cpu._run: 60.1 us at 2 threads, 2.7 us at
# 1), and a forward makes two. On a 2-core AMD EPYC two threads were slower than one up to
# about 0.5-1M elements (64x64x8x8 channels_last forward-train 325 us against 122 us at one
# thread) and faster from about 1M (16x128x28x28 backward 539 us against 976); docs/perf_log.md
# v10. Only speed depends on it: the splits, and so the bits, depend on the shape alone. On a
# machine with many cores or cheaper thread wake-ups a lower value may pay (the variable).
CPU_PARALLEL_MIN_SIZE = int(os.environ.get("FASTBN_CPU_PARALLEL_MIN_SIZE", 1 << 20))

# The common kind of call (plain C-contiguous NumPy arrays, no out=) takes the cpu backend's
# direct path: a few attribute reads in place of the API's full validation, the same passes and
# bits (backends/cpu.py, "direct calls"). False (or FASTBN_CPU_DIRECT=0): every call validates
# in full.
CPU_DIRECT = os.environ.get("FASTBN_CPU_DIRECT", "1").strip() != "0"

# The unit of work splitting, in elements: channels-last (inner == 1) row blocks hold about this
# many values, and channel-major statistics fold their shifted sums into the running mean every
# this many values. Every split is fixed by the shape and these settings alone, so results do
# not depend on the thread count.
CPU_CHUNK_ELEMENTS = 1 << 14

# Tasks a large tensor is split into where the shape allows (enough for 64 cores): channel
# segments when there are few channels, column blocks of short runs.
CPU_TASKS = 64

# Channel-major (inner > 1) tensors with fewer channels than this split each channel into
# segments (CPU_TASKS in all), so that C=1 with millions of values still uses every thread; with
# more, a task owns a channel and its second pass reads the channel from cache.
CPU_MIN_TASKS = 16

# Row blocks per call, at most, when a matrix (channels-last) is split by rows: each keeps a
# partial sum per column and statistic, added in order (a serial merge).
CPU_MAX_TASKS = 64

# Channel runs are read in pieces of this many values, each preceded by a software prefetch of
# the same piece of the next run (the loads run one run ahead; docs/perf_log.md).
CPU_PIECE = 512

# Channel runs shorter than this (inner < CPU_MIN_RUN, e.g. NCHW 7x7) are computed as column
# blocks of an (outer, C * inner) matrix, whose loops are longer than one run.
CPU_MIN_RUN = 512

# The elementwise passes (eval, backward_apply) over channel runs shorter than CPU_MIN_RUN go
# row block by row block. Runs of at least this many values are computed run by run with
# per-channel coefficients; shorter ones (3x3, 5x5 maps) with per-column coefficient vectors,
# whose long column loops vectorize (those vectors, 3 values per column, outgrow the caches
# on larger maps: 64x1024x14x14 eval 8.9 ms per column against 5.2 ms run by run).
CPU_MIN_SCALAR_RUN = 32

# Channels-last rows shorter than this many values are grouped, several to a matrix row, so
# that the column loops are long enough to vectorize (a loop's setup costs about as much as a
# few dozen elements).
CPU_ROW_ELEMENTS = 1024
# ... for tensors of at least this many elements (smaller ones are faster with plain rows).
CPU_GROUP_MIN_SIZE = 1 << 15

# A task fuses statistics and normalization (or gradient sums and dx) over a block of whole
# channels when the block's inputs, over all rows, fit in this many bytes (about half of a
# core's L2), so the second pass reads from cache; larger matrices are split by rows instead.
CPU_FUSED_BYTES = 1 << 20

# ---- CUDA launch configuration (read by fastbn/backends/cuda.py at every launch, so tests can
# shrink it by assigning these attributes). Under numba's simulator (NUMBA_ENABLE_CUDASIM=1) every
# GPU thread is a Python thread, so the defaults there are tiny; FASTBN_CUDA_* overrides either.
_CUDA_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")

# Threads per block: a power of two (block reductions halve it); kernels compile per value.
CUDA_THREADS_PER_BLOCK = int(os.environ.get("FASTBN_CUDA_THREADS_PER_BLOCK",
                                            8 if _CUDA_SIMULATOR else 256))
# Most blocks one launch uses; grid-stride loops cover the rest of the tensor.
CUDA_MAX_BLOCKS = int(os.environ.get("FASTBN_CUDA_MAX_BLOCKS", 4 if _CUDA_SIMULATOR else 2048))
# Fewest blocks a launch uses: numba-cuda warns (NumbaPerformanceWarning) about grids under 128
# blocks, so small problems get idle extra blocks, which exit at once, instead of a warning.
# Results do not depend on the grid size.
CUDA_MIN_BLOCKS = int(os.environ.get("FASTBN_CUDA_MIN_BLOCKS", 1 if _CUDA_SIMULATOR else 128))
# A channel is split across blocks only in pieces of at least this many values per thread.
CUDA_MIN_ITEMS_PER_THREAD = int(os.environ.get("FASTBN_CUDA_MIN_ITEMS_PER_THREAD",
                                               1 if _CUDA_SIMULATOR else 8))
# Channels-last (inner == 1): threads of a block side by side along channels (a power of two).
CUDA_CHANNEL_TILE = int(os.environ.get("FASTBN_CUDA_CHANNEL_TILE", 4 if _CUDA_SIMULATOR else 32))
# Loads each thread issues before using them (memory-level parallelism); compiled in.
CUDA_UNROLL = int(os.environ.get("FASTBN_CUDA_UNROLL", 2 if _CUDA_SIMULATOR else 4))
