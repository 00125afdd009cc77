"""The LoRA runtime: slot buffers and layers (`runtime`, `layers`), the slot table (`slots`), the per-step
plan (`plan`) and its tensor math (`ops`), the shared-input map (`packing`) and the exact merge (`merge`)."""
