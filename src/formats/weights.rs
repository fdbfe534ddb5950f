//! Weight encodings (placeholder, filled in by its branch).
