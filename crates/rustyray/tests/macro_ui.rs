//! Compile-fail tests of the macros: misuse of `#[rustyray::remote]` and
//! `#[rustyray::actor]` fails with a message that says what is wrong and
//! points at the offending code. Each case is one file under `tests/ui/`
//! with the expected compiler output beside it; `tests/ui-pass/` holds the
//! valid forms, which must compile.
//!
//! After changing a macro message, regenerate the expected output with
//! `TRYBUILD=overwrite cargo test -p rustyray --test macro_ui` and read the
//! diff.

#[test]
fn macro_ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui-pass/*.rs");
    t.compile_fail("tests/ui/*.rs");
}
