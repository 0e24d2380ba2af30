"""Everything that crosses ranks: the packed vector, its reduction, agreement and the failure path."""
