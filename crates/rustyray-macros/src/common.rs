//! Parsing shared by the macros: attribute options and signatures.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::Parser;
use syn::spanned::Spanned;
use syn::visit_mut::{self, VisitMut};
use syn::{
    Error, Expr, FnArg, GenericArgument, Generics, Ident, Item, Lit, Pat, Path, PathArguments, ReturnType,
    Signature, Type,
};

/// Options given in the attribute.
#[derive(Default)]
pub(crate) struct AttrOptions {
    pub(crate) num_cpus: Option<f64>,
    pub(crate) num_gpus: Option<f64>,
    pub(crate) max_retries: Option<i32>,
    pub(crate) retry_exceptions: Option<bool>,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) max_task_retries: Option<i32>,
    pub(crate) resources: Vec<(String, f64)>,
}

fn number(e: &Expr) -> syn::Result<f64> {
    match e {
        Expr::Lit(l) => match &l.lit {
            Lit::Float(f) => f.base10_parse(),
            Lit::Int(i) => i.base10_parse::<i64>().map(|v| v as f64),
            other => Err(Error::new_spanned(other, "expected a number")),
        },
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => Ok(-number(&u.expr)?),
        other => Err(Error::new_spanned(other, "expected a number")),
    }
}

/// An integer literal (possibly negated) that fits in `T`. Counts such as
/// `max_retries` are integers; a fraction or an out-of-range value is an
/// error rather than being silently truncated.
fn integer<T: TryFrom<i64>>(e: &Expr) -> syn::Result<T> {
    let v = match e {
        Expr::Lit(l) => match &l.lit {
            Lit::Int(i) => i.base10_parse::<i64>()?,
            other => return Err(Error::new_spanned(other, "expected an integer")),
        },
        Expr::Unary(u) if matches!(u.op, syn::UnOp::Neg(_)) => integer::<i64>(&u.expr)?
            .checked_neg()
            .ok_or_else(|| Error::new_spanned(e, "integer out of range"))?,
        other => return Err(Error::new_spanned(other, "expected an integer")),
    };
    T::try_from(v).map_err(|_| {
        Error::new_spanned(
            e,
            format!("integer out of range for `{}`", std::any::type_name::<T>()),
        )
    })
}

fn boolean(e: &Expr) -> syn::Result<bool> {
    match e {
        Expr::Lit(l) => match &l.lit {
            Lit::Bool(b) => Ok(b.value),
            other => Err(Error::new_spanned(other, "expected true or false")),
        },
        other => Err(Error::new_spanned(other, "expected true or false")),
    }
}

/// Parses `key = value, ...`; `allowed` lists the keys this item accepts.
/// Every key but `resource` may be given once.
pub(crate) fn parse_options(attr: TokenStream, allowed: &[&str]) -> syn::Result<AttrOptions> {
    let mut o = AttrOptions::default();
    let mut seen: Vec<String> = Vec::new();
    let parser = syn::meta::parser(|meta| {
        let key = match meta.path.get_ident() {
            Some(i) => i.to_string(),
            None => {
                return Err(Error::new_spanned(
                    &meta.path,
                    format!("expected an option name; expected one of: {}", allowed.join(", ")),
                ))
            }
        };
        if !allowed.contains(&key.as_str()) {
            return Err(meta.error(format!(
                "unknown option `{key}`; expected one of: {}",
                allowed.join(", ")
            )));
        }
        if key != "resource" {
            if seen.contains(&key) {
                return Err(meta.error(format!("option `{key}` is given more than once")));
            }
            seen.push(key.clone());
        }
        let value: Expr = meta.value()?.parse()?;
        match key.as_str() {
            "num_cpus" => o.num_cpus = Some(number(&value)?),
            "num_gpus" => o.num_gpus = Some(number(&value)?),
            "max_retries" | "max_restarts" => o.max_retries = Some(integer(&value)?),
            "retry_exceptions" => o.retry_exceptions = Some(boolean(&value)?),
            "max_concurrency" => o.max_concurrency = Some(integer(&value)?),
            "max_task_retries" => o.max_task_retries = Some(integer(&value)?),
            "resource" => match &value {
                Expr::Tuple(t) if t.elems.len() == 2 => {
                    let name = match &t.elems[0] {
                        Expr::Lit(l) => match &l.lit {
                            Lit::Str(s) => s.value(),
                            other => {
                                return Err(Error::new_spanned(other, "expected a resource name string"))
                            }
                        },
                        other => return Err(Error::new_spanned(other, "expected a resource name string")),
                    };
                    o.resources.push((name, number(&t.elems[1])?));
                }
                other => return Err(Error::new_spanned(other, "expected (\"name\", amount)")),
            },
            _ => unreachable!("checked against `allowed` above"),
        }
        Ok(())
    });
    parser.parse2(attr)?;
    Ok(o)
}

impl AttrOptions {
    /// The `DeclaredOptions` value these options describe.
    pub(crate) fn declared(&self) -> TokenStream {
        let opt_f = |v: Option<f64>| match v {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        };
        let num_cpus = opt_f(self.num_cpus);
        let num_gpus = self.num_gpus.unwrap_or(0.0);
        let max_retries = match self.max_retries {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        };
        let retry_exceptions = self.retry_exceptions.unwrap_or(false);
        let max_concurrency = match self.max_concurrency {
            Some(v) => quote!(::core::option::Option::Some(#v)),
            None => quote!(::core::option::Option::None),
        };
        let max_task_retries = self.max_task_retries.unwrap_or(0);
        let res = self.resources.iter().map(|(n, v)| quote!((#n, #v)));
        quote! {
            ::rustyray::__private::DeclaredOptions {
                num_cpus: #num_cpus,
                num_gpus: #num_gpus,
                resources: &[#(#res),*],
                max_retries: #max_retries,
                retry_exceptions: #retry_exceptions,
                max_concurrency: #max_concurrency,
                max_task_retries: #max_task_retries,
            }
        }
    }
}

/// The typed parameters of a remote signature (after any receiver).
pub(crate) struct Params {
    pub(crate) names: Vec<Ident>,
    pub(crate) types: Vec<Type>,
}

/// An error about generic parameters or a `where` clause, spanning all of
/// them (`<T>`, or the `where` clause when there are no parameters).
pub(crate) fn generics_error(generics: &Generics, message: String) -> Error {
    match &generics.where_clause {
        Some(w) if generics.params.is_empty() => Error::new_spanned(w, message),
        _ => Error::new_spanned(generics, message),
    }
}

/// Whether `generics` declares any parameter or `where` clause.
pub(crate) fn is_generic(generics: &Generics) -> bool {
    !generics.params.is_empty() || generics.where_clause.is_some()
}

/// Checks that a signature can be remote and collects its parameters.
/// `what` names the item in messages, with its article ("a remote
/// function", "an actor method"); `hint` is appended to every message (empty,
/// or a way out such as "; ..., mark it #[rustyray(local)]").
///
/// Errors span the whole offending tokens (`&str`, `<T>`, `(a, b)`), so
/// the compiler underlines all of them rather than their first token.
pub(crate) fn params(sig: &Signature, what: &str, hint: &str) -> syn::Result<Params> {
    if is_generic(&sig.generics) {
        return Err(generics_error(
            &sig.generics,
            format!("{what} cannot be generic: the registry needs one concrete function per name{hint}"),
        ));
    }
    if let Some(c) = &sig.constness {
        return Err(Error::new_spanned(c, format!("{what} cannot be `const`{hint}")));
    }
    if let Some(u) = &sig.unsafety {
        return Err(Error::new_spanned(u, format!("{what} cannot be `unsafe`{hint}")));
    }
    if let Some(a) = &sig.abi {
        return Err(Error::new_spanned(
            a,
            format!("{what} cannot have an `extern` ABI{hint}"),
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(Error::new_spanned(v, format!("{what} cannot be variadic{hint}")));
    }
    let mut names = Vec::new();
    let mut types = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(_) => continue,
            FnArg::Typed(pt) => {
                if !matches!(&*pt.pat, Pat::Ident(_) | Pat::Wild(_)) {
                    return Err(Error::new_spanned(
                        &pt.pat,
                        format!("{what} takes plain named parameters (`name: Type`), not patterns{hint}"),
                    ));
                }
                check_owned(&pt.ty, what, "parameter", hint)?;
                names.push(format_ident!("__arg{}", i));
                types.push((*pt.ty).clone());
            }
        }
    }
    Ok(Params { names, types })
}

/// Rejects references, `impl Trait` and other types that cannot cross a
/// process boundary; `hint` is appended to the message.
pub(crate) fn check_owned(ty: &Type, what: &str, role: &str, hint: &str) -> syn::Result<()> {
    match ty {
        Type::Reference(r) => Err(Error::new_spanned(
            r,
            format!(
                "{what} {role} must be an owned type (Serialize + DeserializeOwned + Send + Sync + 'static), not a reference{hint}"
            ),
        )),
        Type::ImplTrait(t) => Err(Error::new_spanned(
            t,
            format!("{what} {role} cannot be `impl Trait`: its type must be concrete to be encoded{hint}"),
        )),
        Type::TraitObject(t) => Err(Error::new_spanned(
            t,
            format!("{what} {role} cannot be a trait object: its type must be concrete to be encoded{hint}"),
        )),
        Type::Ptr(p) => Err(Error::new_spanned(
            p,
            format!("{what} {role} cannot be a raw pointer{hint}"),
        )),
        Type::BareFn(f) => Err(Error::new_spanned(
            f,
            format!("{what} {role} cannot be a function pointer: code does not travel as data{hint}"),
        )),
        Type::Paren(p) => check_owned(&p.elem, what, role, hint),
        Type::Group(g) => check_owned(&g.elem, what, role, hint),
        _ => Ok(()),
    }
}

/// What a remote signature returns.
pub(crate) struct Output {
    /// The type of the object the call produces.
    pub(crate) ty: Type,
    /// Whether the function returns a `Result` whose `Err` is a task error.
    pub(crate) fallible: bool,
}

impl Output {
    /// Wraps `value` (an expression of the function's return type) into an
    /// `InvokeResult`.
    ///
    /// The value is bound to a variable that carries the span of the
    /// produced type, and passed from there: a type that is not `Data` is
    /// then reported at that type in the signature rather than at the
    /// attribute.
    pub(crate) fn wrap(&self, value: TokenStream) -> TokenStream {
        let span = self.ty.span();
        let out = Ident::new("__rustyray_out", span);
        let wrapper = if self.fallible {
            quote_spanned!(span=> ::rustyray::__private::fallible)
        } else {
            quote_spanned!(span=> ::rustyray::__private::output)
        };
        quote! {{
            let #out = #value;
            #wrapper(#out)
        }}
    }
}

/// Reads the return type: `T`, `()`, or `Result<T, E>` (also a
/// one-parameter `Result<T>` alias). `hint` is as for [`params`].
pub(crate) fn output(sig: &Signature, what: &str, hint: &str) -> syn::Result<Output> {
    let ty = match &sig.output {
        ReturnType::Default => {
            return Ok(Output {
                ty: syn::parse_quote!(()),
                fallible: false,
            })
        }
        ReturnType::Type(_, t) => (**t).clone(),
    };
    check_owned(&ty, what, "return type", hint)?;
    if let Some(ok) = result_ok_type(&ty) {
        check_owned(&ok, what, "return type", hint)?;
        return Ok(Output {
            ty: ok,
            fallible: true,
        });
    }
    Ok(Output { ty, fallible: false })
}

/// The statements that decode the parameters from `args` (an
/// `ArgList` in scope): `let name: Type = args.take(i)?;` for each.
///
/// `take` requires `Type: Data`; its name carries the span of the
/// parameter's type, so a parameter type that is not `Data` is reported at
/// that type in the signature rather than at the attribute.
pub(crate) fn take_args(p: &Params) -> TokenStream {
    let lets = p.names.iter().zip(&p.types).enumerate().map(|(i, (name, ty))| {
        let take = Ident::new("take", ty.span());
        quote!(let #name: #ty = args.#take(#i)?;)
    });
    quote!(#(#lets)*)
}

/// `T` when `ty` is spelled `...Result<T, ..>`.
pub(crate) fn result_ok_type(ty: &Type) -> Option<Type> {
    let Type::Path(p) = ty else { return None };
    let last = p.path.segments.last()?;
    if last.ident != "Result" {
        return None;
    }
    let PathArguments::AngleBracketed(args) = &last.arguments else {
        return None;
    };
    match args.args.first()? {
        GenericArgument::Type(t) => Some(t.clone()),
        _ => None,
    }
}

/// An identifier built from parts, at the call site.
pub(crate) fn ident(parts: &str) -> Ident {
    Ident::new(parts, Span::call_site())
}

/// The name of a generated item: `prefix` followed by `names`, every name
/// but the last preceded by its length in bytes and followed by `_`, so
/// `("__m_", [A, b_c])` gives `__m_1A_b_c` and `("__m_", [A_b, c])` gives
/// `__m_3A_b_c`.
///
/// The scheme is injective for a given prefix: an identifier never starts
/// with a digit, so the length ends at the first non-digit and says where
/// each name ends. Plain `{class}_{method}` would not be: class `A` with
/// method `b_c` and class `A_b` with method `c` would share items in one
/// module. Names are taken unraw (`r#type` as `type`), which names the same
/// item and keeps the result a valid identifier.
pub(crate) fn item_name(prefix: &str, names: &[&Ident]) -> Ident {
    let mut s = String::from(prefix);
    if let Some((last, init)) = names.split_last() {
        for name in init {
            let name = name.unraw().to_string();
            s.push_str(&format!("{}{name}_", name.len()));
        }
        s.push_str(&last.unraw().to_string());
    }
    ident(&s)
}

/// Rewrites `Self` to the class name in types taken out of an `impl` block.
///
/// The stubs, invokers and option builders the actor macro generates live
/// outside the user's `impl` (free functions, or `impl` blocks of other
/// types), where `Self` is unavailable or means another type. Paths that
/// start with `Self` (`Self`, `Vec<Self>`, `Self::CONST` in an array length,
/// the `Self` in `<Self as Trait>::Assoc`) get the class name, with the span
/// of the `Self` it replaces so errors still point at the user's code.
/// Items nested in expressions are left alone: there `Self` is their own.
pub(crate) struct ReplaceSelf<'a> {
    pub(crate) class: &'a Ident,
}

impl VisitMut for ReplaceSelf<'_> {
    fn visit_path_mut(&mut self, path: &mut Path) {
        if path.leading_colon.is_none() {
            if let Some(first) = path.segments.first_mut() {
                if first.ident == "Self" {
                    let mut class = self.class.clone();
                    class.set_span(first.ident.span());
                    first.ident = class;
                }
            }
        }
        visit_mut::visit_path_mut(self, path);
    }

    fn visit_item_mut(&mut self, _: &mut Item) {}
}

/// `sig` with `Self` replaced by `class` in its parameter and return types
/// (see [`ReplaceSelf`]). The receiver, if any, is kept as written.
pub(crate) fn resolve_self(sig: &Signature, class: &Ident) -> Signature {
    let mut sig = sig.clone();
    let mut v = ReplaceSelf { class };
    for input in &mut sig.inputs {
        if let FnArg::Typed(pt) = input {
            v.visit_type_mut(&mut pt.ty);
        }
    }
    if let ReturnType::Type(_, ty) = &mut sig.output {
        v.visit_type_mut(ty);
    }
    sig
}
