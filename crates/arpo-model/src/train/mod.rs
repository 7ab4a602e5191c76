//! Training on top of the model: filled by the training issue (issue 4).
