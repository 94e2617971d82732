"""Shapes the mLSTM kernels take, importable without Triton (configs check them at load)."""

# The chunkwise Triton kernels hold all of a head's q/k width in one tile: xLSTM-7B's 256 compiles for
# sm_90 (with spills), 512 would not fit (docs/mlstm_kernel_notes.md).
MAX_DQK = 256
