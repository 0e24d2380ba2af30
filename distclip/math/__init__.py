"""Local work on this rank's gradients: partial norms, coalescing and scaling."""
