"""Reading gradient norms without clipping: per-tensor norms, descriptions and the audit."""
