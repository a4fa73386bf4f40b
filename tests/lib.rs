//! End-to-end tests of the training system. They start real coordinator and
//! worker processes on `127.0.0.1:0` and live under `tests/tests/`.
