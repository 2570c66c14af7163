//! The esk writer. (wip)
pub mod batch;
