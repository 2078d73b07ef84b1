"""TensorRT: plan building (`plan`) and the runtime that executes a plan (`runtime`)."""
