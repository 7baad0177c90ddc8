//! Procedural macros of RustyRay: `#[remote]` turns a function into a
//! remote function, `#[actor]` turns a struct and its `impl` block into an
//! actor class. Both register the code in the link-time registry under a
//! stable name (`module::path::item`) and generate typed stubs; see the
//! `rustyray` crate for how they are used.

use proc_macro::TokenStream;

mod actor;
mod common;
mod remote;

/// Makes a function remote: `f::remote(&ray, args..)` submits it as a task
/// and returns an `ObjectRef` of its result; `f::options()` sets per-call
/// options. The function itself stays callable.
///
/// Attribute options: `num_cpus`, `num_gpus`, `max_retries`,
/// `retry_exceptions`, `resource = ("name", amount)` (repeatable).
#[proc_macro_attribute]
pub fn remote(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    remote::expand(attr.into(), item.clone())
        .unwrap_or_else(|e| error_with_item(e, item))
        .into()
}

/// Makes a struct an actor class (on the struct) and its methods remote
/// (on its `impl` block, which must have a `fn new(..) -> Self`
/// constructor).
///
/// Every `&self` / `&mut self` method of the `impl` block becomes remote:
/// `handle.method(args..)` calls it on the actor and returns an `ObjectRef`
/// of its result, so its parameters and result follow the rules of remote
/// functions (owned, serializable types). `Self` may appear in those types
/// (`-> Self`, `other: Self`, `Vec<Self>`); it stands for the class, which
/// must then be serializable too.
///
/// Attribute options on the `impl`: `num_cpus`, `num_gpus`,
/// `max_restarts`, `max_task_retries`, `max_concurrency`,
/// `resource = ("name", amount)`.
///
/// # Plain methods: `#[rustyray(local)]`
///
/// A method marked `#[rustyray(local)]` stays a plain method, callable by
/// the actor's own code: it gets no stub and no registry entry, and its
/// signature is not checked (it may take `&str`, be generic, take `self`).
/// The macro removes the attribute from the emitted `impl` block. `local` is
/// the only argument `#[rustyray(..)]` accepts; the constructor `new` cannot
/// be local.
///
/// ```ignore
/// #[rustyray::actor]
/// impl Greeter {
///     fn new(greeting: String) -> Self {
///         Greeter { greeting }
///     }
///
///     fn greet(&self, name: String) -> String {
///         self.format(&name)
///     }
///
///     #[rustyray(local)]
///     fn format(&self, name: &str) -> String {
///         format!("{} {name}", self.greeting)
///     }
/// }
/// ```
#[proc_macro_attribute]
pub fn actor(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    actor::expand(attr.into(), item.clone())
        .unwrap_or_else(|e| error_with_item(e, actor::without_helper_attrs(item)))
        .into()
}

/// Marks the program's `main`: when the process was started as a worker
/// process by a node daemon, it runs the worker loop and exits instead of
/// running `main`'s body; otherwise `main` runs as written. Same as calling
/// `rustyray::worker_entry()` first thing in `main`.
///
/// ```ignore
/// #[rustyray::main]
/// fn main() -> rustyray::Result<()> {
///     let ray = rustyray::init_with(
///         rustyray::Config::new().worker_mode(rustyray::WorkerMode::Processes),
///     )?;
///     // ...
///     Ok(())
/// }
/// ```
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    expand_main(attr.into(), item.clone())
        .unwrap_or_else(|e| error_with_item(e, item))
        .into()
}

fn expand_main(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    if !attr.is_empty() {
        return Err(syn::Error::new_spanned(
            attr,
            "#[rustyray::main] takes no arguments",
        ));
    }
    let mut f: syn::ItemFn = syn::parse2(item)?;
    if f.sig.asyncness.is_some() {
        return Err(syn::Error::new_spanned(
            f.sig.asyncness,
            "#[rustyray::main] goes on a plain `fn main`; start an async runtime inside it",
        ));
    }
    if !f.sig.inputs.is_empty() || !f.sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &f.sig,
            "main takes no arguments and no generics",
        ));
    }
    let entry: syn::Stmt = syn::parse_quote!(::rustyray::worker_entry(););
    f.block.stmts.insert(0, entry);
    Ok(quote::quote!(#f))
}

/// The output of a macro that rejected its item: the error, followed by the
/// item unchanged. Keeping the item means the rest of the crate still sees
/// the function or struct, so the user gets the macro's message alone
/// rather than also one "cannot find" error per use of the item.
fn error_with_item(e: syn::Error, item: proc_macro2::TokenStream) -> proc_macro2::TokenStream {
    let mut out = e.into_compile_error();
    out.extend(item);
    out
}
