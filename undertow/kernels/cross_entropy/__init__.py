"""Cross-entropy pieces that need a native loop on CPU: the fused head loss's per-chunk soft-cap,
log-sum-exp and logits gradient (native.py). The loss itself and its PyTorch form live in
models/common/fused_loss.py (head_loss_sum) and models/common/loss.py (lm_loss_sum, the spec)."""
