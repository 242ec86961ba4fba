//! Model repositories: local folders, the Hugging Face cache, downloads.
