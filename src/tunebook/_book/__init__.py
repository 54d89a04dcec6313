"""Where results live. See records.py for the schema, files.py for the on-disk contract."""

from .files import BookWarning, atomic_write_text, merge_write, read_document
from .layers import Book, KernelIdentity, Page, book_file_name
from .records import BookFormatError, Document, Entry, Result, config_id, config_record, now_iso

__all__ = [
    "Book",
    "BookFormatError",
    "BookWarning",
    "Document",
    "Entry",
    "KernelIdentity",
    "Page",
    "Result",
    "atomic_write_text",
    "book_file_name",
    "config_id",
    "config_record",
    "merge_write",
    "now_iso",
    "read_document",
]
