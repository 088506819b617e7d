"""Bytes in and out: storage on any fsspec URL (one atomic writer), the download cache, dpdm checkpoints, and the
import of official EDM network pickles."""
