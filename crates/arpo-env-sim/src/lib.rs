//! The embedded simulated desktop (work in progress: see its issue).

pub mod desktop;
mod error;
pub mod font;
pub mod pyautogui;
pub mod render;

pub use error::SimError;
