//! `#[remote]` on a function.

use crate::common::{item_name, output, params, parse_options, take_args};
use proc_macro2::TokenStream;
use quote::quote;
use syn::{Error, FnArg, Item};

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let opts = parse_options(
        attr,
        &[
            "num_cpus",
            "num_gpus",
            "max_retries",
            "retry_exceptions",
            "resource",
        ],
    )?;
    let func = match syn::parse2::<Item>(item)? {
        Item::Fn(f) => f,
        Item::Struct(s) => {
            let (token, name) = (&s.struct_token, &s.ident);
            return Err(not_a_function(
                quote!(#token #name),
                "; for a struct, use #[rustyray::actor] on the struct and on its impl block",
            ));
        }
        Item::Impl(i) => {
            let (token, self_ty) = (&i.impl_token, &i.self_ty);
            return Err(not_a_function(
                quote!(#token #self_ty),
                "; for an impl block, use #[rustyray::actor] on it and on its struct",
            ));
        }
        other => return Err(not_a_function(quote!(#other), "")),
    };
    let sig = &func.sig;
    if let Some(FnArg::Receiver(r)) = sig.inputs.first() {
        return Err(Error::new_spanned(
            r,
            "a remote function cannot take `self`; to make methods remote, put #[rustyray::actor] on the struct and on its impl block",
        ));
    }
    let p = params(sig, "a remote function", "")?;
    let out = output(sig, "a remote function", "")?;
    let name = &sig.ident;
    let vis = &func.vis;
    let is_async = sig.asyncness.is_some();
    let take_args = take_args(&p);
    // One name each: injective already; the prefixes keep them apart from
    // the actor macro's items.
    let entry = item_name("__RUSTYRAY_FN_", &[name]);
    let invoke = item_name("__rustyray_invoke_", &[name]);
    let options_ty = item_name("__RustyRayOptions_", &[name]);
    let declared = opts.declared();
    let n = p.names.len();
    let names = &p.names;
    let types = &p.types;
    let out_ty = &out.ty;
    let call = if is_async {
        out.wrap(quote!(#name(#(#names),*).await))
    } else {
        out.wrap(quote!(#name(#(#names),*)))
    };
    let body = if is_async {
        quote! {
            fn #invoke(mut args: ::rustyray::ArgList)
                -> ::rustyray::__private::BoxFuture<::rustyray::__private::InvokeResult>
            {
                ::std::boxed::Box::pin(async move {
                    args.expect_len(#n)?;
                    #take_args
                    #call
                })
            }
        }
    } else {
        quote! {
            fn #invoke(mut args: ::rustyray::ArgList) -> ::rustyray::__private::InvokeResult {
                args.expect_len(#n)?;
                #take_args
                #call
            }
        }
    };
    let kind = if is_async {
        quote!(::rustyray::__private::FunctionBody::Async(#invoke))
    } else {
        quote!(::rustyray::__private::FunctionBody::Sync(#invoke))
    };
    let doc =
        format!("Remote stub of [`{name}`](fn@{name}): `{name}::remote(&ray, ..)` submits it as a task.");
    Ok(quote! {
        #func

        #[doc = #doc]
        #[allow(non_camel_case_types)]
        #vis struct #name {
            _private: (),
        }

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[::rustyray::__private::linkme::distributed_slice(::rustyray::__private::REMOTE_FUNCTIONS)]
        #[linkme(crate = ::rustyray::__private::linkme)]
        static #entry: ::rustyray::__private::FunctionEntry = ::rustyray::__private::FunctionEntry {
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
            body: #kind,
            options: #declared,
        };

        #[doc(hidden)]
        #[allow(non_snake_case)]
        #body

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone)]
        #vis struct #options_ty(::rustyray::TaskOptions);

        impl ::rustyray::TaskOptionsBuilder for #options_ty {
            fn task_options(&mut self) -> &mut ::rustyray::TaskOptions {
                &mut self.0
            }
        }

        impl #options_ty {
            /// Submits the task with these options.
            #[allow(clippy::too_many_arguments)]
            pub fn remote(
                &self,
                ray: &::rustyray::Ray,
                #( #names: impl ::rustyray::IntoArg<#types> ),*
            ) -> ::rustyray::Result<::rustyray::ObjectRef<#out_ty>> {
                let args = ::std::vec![#( ::rustyray::IntoArg::<#types>::into_arg(#names, ray)? ),*];
                ::rustyray::__private::submit(ray, &#entry, &self.0, args)
            }
        }

        impl #name {
            /// The name this function is registered under.
            pub const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name));

            /// Submits the function as a task; arguments may be values or
            /// `ObjectRef`s of the parameter types.
            #[allow(clippy::too_many_arguments)]
            pub fn remote(
                ray: &::rustyray::Ray,
                #( #names: impl ::rustyray::IntoArg<#types> ),*
            ) -> ::rustyray::Result<::rustyray::ObjectRef<#out_ty>> {
                Self::options().remote(ray, #(#names),*)
            }

            /// Per-call options (`num_cpus`, `max_retries`, `name`, ...).
            pub fn options() -> #options_ty {
                #options_ty(::core::default::Default::default())
            }

            /// The function's registry entry.
            pub fn entry() -> &'static ::rustyray::__private::FunctionEntry {
                &#entry
            }
        }
    })
}

/// The error for `#[remote]` on something other than a function, spanning
/// `what` (the item's head, e.g. `struct Name`); `hint` says what to use
/// instead.
fn not_a_function(what: TokenStream, hint: &str) -> Error {
    Error::new_spanned(what, format!("#[rustyray::remote] goes on a function{hint}"))
}
