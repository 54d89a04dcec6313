"""Where results live: the schema (records.py), files on disk (files.py: bounded reads,
atomic writes, format 1 read), format 2's page directories (pagedir.py), the store interface
and its directory store (stores.py), the Redis fleet store (redis_store.py), and the book and
its pages composed over those stores (pages.py)."""

from .._errors import BookFormatError, BookWarning
from .files import atomic_write_text, read_book_file, read_document
from .pages import Book, KernelIdentity, Page, book_file_name, relation
from .records import Document, Entry, Result, config_id, config_record, now_iso
from .stores import BookStore, DirectoryStore

__all__ = [
    "Book",
    "BookFormatError",
    "BookStore",
    "BookWarning",
    "DirectoryStore",
    "Document",
    "Entry",
    "KernelIdentity",
    "Page",
    "Result",
    "atomic_write_text",
    "book_file_name",
    "config_id",
    "config_record",
    "now_iso",
    "read_book_file",
    "read_document",
    "relation",
]
