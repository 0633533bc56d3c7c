"""Retrieval pieces every stage shares: embeddings, a FAISS index, BM25, tool and
example retrievers, query-aware chunking. Knows nothing about stages or storage."""

from contextwise.retrievers.chunks import rank_chunks, select_chunks
from contextwise.retrievers.embedder import Embedder, get_embedder
from contextwise.retrievers.examples import ExampleRetriever
from contextwise.retrievers.index import VectorIndex
from contextwise.retrievers.lexical import BM25
from contextwise.retrievers.tools import ToolRetriever

__all__ = [
    "BM25",
    "Embedder",
    "ExampleRetriever",
    "ToolRetriever",
    "VectorIndex",
    "get_embedder",
    "rank_chunks",
    "select_chunks",
]
