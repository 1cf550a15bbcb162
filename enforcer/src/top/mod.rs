//! `enforcer top`: a live terminal view of the node through the agent's
//! socket. [`model`] owns what is shown (rows from `status` answers, rates
//! derived from two of them, history, sorting, selection, keys); [`view`]
//! draws it with ratatui; the command in `cli::top` talks to the agent and
//! the terminal.

pub mod model;
pub mod view;
