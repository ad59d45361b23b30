"""Layer 2, the resolution: from the visible set to one merged model, cached by Merkle root."""
