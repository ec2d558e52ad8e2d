//! placeholder: canonical text
