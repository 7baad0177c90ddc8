//! `#[actor]` on a struct (the class and its stub type) and on its `impl`
//! block (constructor, methods and registry entries).

use crate::common::{
    generics_error, ident, is_generic, item_name, output, params, parse_options, resolve_self,
    result_ok_type, take_args,
};
use proc_macro2::TokenStream;
use quote::quote;
use syn::ext::IdentExt;
use syn::{
    Attribute, Error, FnArg, ImplItem, ImplItemFn, Item, ItemImpl, ItemStruct, ReturnType, Signature, Type,
};

/// Appended to the messages that reject an actor method's signature: the
/// method may be a plain helper that was never meant to be remote.
const LOCAL_HINT: &str = "; if it is a plain helper, not a remote method, mark it #[rustyray(local)]";

pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    match syn::parse2::<Item>(item)? {
        Item::Struct(s) => {
            if !attr.is_empty() {
                return Err(Error::new_spanned(
                    attr,
                    "actor options go on the impl block: #[rustyray::actor(max_restarts = 1)] impl ...",
                ));
            }
            expand_struct(s)
        }
        Item::Impl(i) => expand_impl(attr, i),
        other => Err(Error::new_spanned(
            other,
            "#[rustyray::actor] goes on a struct and on its impl block",
        )),
    }
}

fn stub_name(class: &syn::Ident) -> syn::Ident {
    ident(&format!("{}Stub", class.unraw()))
}

/// Whether `attr` is the actor macro's helper attribute `#[rustyray(..)]`.
fn is_helper(attr: &Attribute) -> bool {
    attr.path().is_ident("rustyray")
}

/// The attributes of an impl item, if it has any syn can see.
fn impl_item_attrs_mut(item: &mut ImplItem) -> Option<&mut Vec<Attribute>> {
    match item {
        ImplItem::Fn(f) => Some(&mut f.attrs),
        ImplItem::Const(c) => Some(&mut c.attrs),
        ImplItem::Type(t) => Some(&mut t.attrs),
        ImplItem::Macro(m) => Some(&mut m.attrs),
        _ => None,
    }
}

/// Removes the `#[rustyray(..)]` helper attributes from the items of `imp`:
/// they are read by the macro and mean nothing to the compiler.
fn strip_helper_attrs(imp: &mut ItemImpl) {
    for item in &mut imp.items {
        if let Some(attrs) = impl_item_attrs_mut(item) {
            attrs.retain(|a| !is_helper(a));
        }
    }
}

/// `item` with the helper attributes removed when it is an `impl` block,
/// else unchanged. Used when the macro rejects its item: the item is still
/// emitted, and a leftover `#[rustyray(..)]` would add an unrelated
/// "cannot find attribute" error to the macro's own.
pub(crate) fn without_helper_attrs(item: TokenStream) -> TokenStream {
    match syn::parse2::<ItemImpl>(item.clone()) {
        Ok(mut imp) => {
            strip_helper_attrs(&mut imp);
            quote!(#imp)
        }
        Err(_) => item,
    }
}

/// Reads the `#[rustyray(..)]` helper attributes of a method: the one that
/// marks it `local` (a plain method, not remote), if any. Any other
/// argument is an error.
fn local_attr(attrs: &[Attribute]) -> syn::Result<Option<&Attribute>> {
    let mut local = None;
    for attr in attrs.iter().filter(|a| is_helper(a)) {
        let mut any = false;
        attr.parse_nested_meta(|meta| {
            any = true;
            if !meta.path.is_ident("local") {
                let path = &meta.path;
                let name = quote!(#path).to_string().replace(' ', "");
                return Err(meta.error(format!(
                    "unknown argument `{name}` in #[rustyray(..)]; expected `local` (a plain method, not remote)"
                )));
            }
            if !meta.input.is_empty() && !meta.input.peek(syn::Token![,]) {
                return Err(meta.error("`local` takes no value: #[rustyray(local)]"));
            }
            if local.is_some() {
                return Err(meta.error("`local` is given more than once"));
            }
            local = Some(attr);
            Ok(())
        })?;
        if !any {
            return Err(Error::new_spanned(
                attr,
                "expected an argument in #[rustyray(..)]: `local` (a plain method, not remote)",
            ));
        }
    }
    Ok(local)
}

fn expand_struct(s: ItemStruct) -> syn::Result<TokenStream> {
    if is_generic(&s.generics) {
        return Err(generics_error(
            &s.generics,
            "an actor cannot be generic: the registry needs one concrete class per name".into(),
        ));
    }
    let name = &s.ident;
    let vis = &s.vis;
    let stub = stub_name(name);
    let doc = format!("Typed method stubs of the [`{name}`] actor, reached through `ActorHandle<{name}>`.");
    Ok(quote! {
        #s

        #[doc = #doc]
        #[derive(Clone, Debug)]
        #vis struct #stub {
            raw: ::rustyray::RawActor,
        }

        impl ::rustyray::ActorStub for #stub {
            fn from_raw(raw: ::rustyray::RawActor) -> Self {
                Self { raw }
            }
            fn raw(&self) -> &::rustyray::RawActor {
                &self.raw
            }
        }
    })
}

fn returns_self(f: &ImplItemFn, class: &syn::Ident) -> Option<bool> {
    let ReturnType::Type(_, ty) = &f.sig.output else {
        return None;
    };
    let is_self = |t: &Type| match t {
        Type::Path(p) => p.path.is_ident("Self") || p.path.is_ident(class),
        _ => false,
    };
    if is_self(ty) {
        return Some(false);
    }
    result_ok_type(ty).filter(is_self).map(|_| true)
}

/// The error for a constructor `new` that does not return `Self`: at its
/// return type, or at its signature when it returns nothing.
fn not_returning_self(sig: &Signature) -> Error {
    let message = "the actor constructor `new` must return `Self` (or `Result<Self, E>`)";
    match &sig.output {
        ReturnType::Type(_, ty) => Error::new_spanned(ty, message),
        ReturnType::Default => Error::new_spanned(sig, message),
    }
}

fn expand_impl(attr: TokenStream, imp: ItemImpl) -> syn::Result<TokenStream> {
    let opts = parse_options(
        attr,
        &[
            "num_cpus",
            "num_gpus",
            "max_restarts",
            "max_task_retries",
            "max_concurrency",
            "resource",
        ],
    )?;
    if is_generic(&imp.generics) {
        return Err(generics_error(
            &imp.generics,
            "an actor cannot be generic: the registry needs one concrete class per name".into(),
        ));
    }
    if let Some((_, path, _)) = &imp.trait_ {
        return Err(Error::new_spanned(
            path,
            "#[rustyray::actor] goes on the inherent impl block (`impl Name { .. }`), not a trait impl",
        ));
    }
    let class = match &*imp.self_ty {
        Type::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => p
            .path
            .get_ident()
            .cloned()
            .ok_or_else(|| Error::new_spanned(p, "expected a type name"))?,
        other => {
            return Err(Error::new_spanned(
                other,
                "#[rustyray::actor] needs a plain, non-generic struct name here",
            ))
        }
    };
    let stub = stub_name(&class);
    // Items named after the class alone, or the class and one method, with
    // the class name's length (see `item_name`): two classes of one module
    // never share an item, whatever their method names.
    let class_entry = item_name("__RUSTYRAY_CLASS_", &[&class]);
    let options_ty = item_name("__RustyRayActorOptions_", &[&class]);
    let ctor_fn = item_name("__rustyray_construct_", &[&class]);

    let mut ctor = None;
    let mut methods = Vec::new();
    for item in &imp.items {
        let f = match item {
            ImplItem::Fn(f) => f,
            ImplItem::Const(syn::ImplItemConst { attrs, .. })
            | ImplItem::Type(syn::ImplItemType { attrs, .. })
            | ImplItem::Macro(syn::ImplItemMacro { attrs, .. }) => {
                if let Some(a) = attrs.iter().find(|a| is_helper(a)) {
                    return Err(Error::new_spanned(
                        a,
                        "#[rustyray(..)] goes on a method of the actor impl block",
                    ));
                }
                continue;
            }
            _ => continue,
        };
        let is_ctor = f.sig.ident == "new" && !matches!(f.sig.inputs.first(), Some(FnArg::Receiver(_)));
        if let Some(local) = local_attr(&f.attrs)? {
            if is_ctor {
                return Err(Error::new_spanned(
                    local,
                    "the actor constructor `new` cannot be #[rustyray(local)]: the runtime creates the actor with it",
                ));
            }
            // A plain method: left as written, with no stub and no checks.
            continue;
        }
        match f.sig.inputs.first() {
            Some(FnArg::Receiver(r)) => {
                if r.reference.is_none() {
                    return Err(Error::new_spanned(
                        r,
                        format!(
                            "an actor method takes `&self` or `&mut self`: the actor keeps its state between calls{LOCAL_HINT}"
                        ),
                    ));
                }
                methods.push((f, r.mutability.is_some()));
            }
            _ if f.sig.ident == "new" => {
                let fallible = returns_self(f, &class).ok_or_else(|| not_returning_self(&f.sig))?;
                if let Some(a) = &f.sig.asyncness {
                    return Err(Error::new_spanned(
                        a,
                        "the actor constructor `new` cannot be async",
                    ));
                }
                ctor = Some((f, fallible));
            }
            _ => {}
        }
    }
    let Some((ctor, ctor_fallible)) = ctor else {
        return Err(Error::new_spanned(
            &imp.self_ty,
            "an actor impl block needs a constructor: `fn new(..) -> Self`",
        ));
    };
    // The generated code lives outside the impl block, where `Self` is not
    // the class: signatures are read with `Self` spelled out.
    let cp = params(&resolve_self(&ctor.sig, &class), "an actor constructor", "")?;
    let is_async = methods.iter().any(|(f, _)| f.sig.asyncness.is_some());
    let declared = opts.declared();

    let (cnames, ctypes) = (&cp.names, &cp.types);
    let cn = cnames.len();
    let ctake_args = take_args(&cp);
    let make = if ctor_fallible {
        quote!(::rustyray::__private::fallible_instance::<#class, _>(#class::new(#(#cnames),*)))
    } else {
        quote!(::core::result::Result::Ok(::rustyray::__private::new_instance::<#class>(#class::new(#(#cnames),*))))
    };

    let mut generated = Vec::new();
    let mut stubs = Vec::new();
    for (f, mutable) in &methods {
        let mname = &f.sig.ident;
        let sig = resolve_self(&f.sig, &class);
        let p = params(&sig, "an actor method", LOCAL_HINT)?;
        let out = output(&sig, "an actor method", LOCAL_HINT)?;
        let entry = item_name("__RUSTYRAY_METHOD_", &[&class, mname]);
        let invoke = item_name("__rustyray_method_", &[&class, mname]);
        let (names, types) = (&p.names, &p.types);
        let n = names.len();
        let take_args = take_args(&p);
        let out_ty = &out.ty;
        // The runtime locks the instance (shared for `&self`, exclusive
        // for `&mut self`) in submission order and hands it over.
        let (this, access) = if *mutable {
            (
                quote!(::rustyray::__private::instance_mut::<#class>(&mut **guard)?),
                quote!(instance_mut),
            )
        } else {
            (
                quote!(::rustyray::__private::instance_ref::<#class>(&**guard)?),
                quote!(instance_ref),
            )
        };
        let call_async = out.wrap(quote!(#class::#mname(this, #(#names),*).await));
        let call_sync = out.wrap(quote!(#class::#mname(this, #(#names),*)));
        let (body, kind) = if f.sig.asyncness.is_some() {
            let (guard_ty, variant) = if *mutable {
                (quote!(ExclusiveGuard), quote!(AsyncMut))
            } else {
                (quote!(SharedGuard), quote!(AsyncRef))
            };
            (
                quote! {
                    fn #invoke(
                        #[allow(unused_mut)]
                        mut guard: ::rustyray::__private::#guard_ty,
                        mut args: ::rustyray::ArgList,
                    ) -> ::rustyray::__private::BoxFuture<::rustyray::__private::InvokeResult> {
                        ::std::boxed::Box::pin(async move {
                            args.expect_len(#n)?;
                            #take_args
                            let this = #this;
                            #call_async
                        })
                    }
                },
                quote!(::rustyray::__private::MethodBody::#variant(#invoke)),
            )
        } else {
            let (state_ty, variant) = if *mutable {
                (quote!(&mut (dyn ::core::any::Any + Send + Sync)), quote!(SyncMut))
            } else {
                (quote!(&(dyn ::core::any::Any + Send + Sync)), quote!(SyncRef))
            };
            (
                quote! {
                    fn #invoke(
                        state: #state_ty,
                        mut args: ::rustyray::ArgList,
                    ) -> ::rustyray::__private::InvokeResult {
                        args.expect_len(#n)?;
                        #take_args
                        let this = ::rustyray::__private::#access::<#class>(state)?;
                        #call_sync
                    }
                },
                quote!(::rustyray::__private::MethodBody::#variant(#invoke)),
            )
        };
        generated.push(quote! {
            #[doc(hidden)]
            #[allow(non_upper_case_globals)]
            #[::rustyray::__private::linkme::distributed_slice(::rustyray::__private::ACTOR_METHODS)]
            #[linkme(crate = ::rustyray::__private::linkme)]
            static #entry: ::rustyray::__private::MethodEntry = ::rustyray::__private::MethodEntry {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#class), "::", ::core::stringify!(#mname)),
                class: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#class)),
                body: #kind,
            };

            #[doc(hidden)]
            #[allow(non_snake_case)]
            #body
        });
        let doc = format!("Calls [`{class}::{mname}`] on the actor; returns a reference to its result.");
        stubs.push(quote! {
            #[doc = #doc]
            #[allow(clippy::too_many_arguments)]
            pub fn #mname(
                &self,
                #( #names: impl ::rustyray::IntoArg<#types> ),*
            ) -> ::rustyray::Result<::rustyray::ObjectRef<#out_ty>> {
                let ray = self.raw.ray();
                let args = ::std::vec![#( ::rustyray::IntoArg::<#types>::into_arg(#names, ray)? ),*];
                ::core::result::Result::Ok(self.raw.call(&#entry, args)?.typed())
            }
        });
    }

    let mut imp = imp;
    strip_helper_attrs(&mut imp);
    Ok(quote! {
        #imp

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #[::rustyray::__private::linkme::distributed_slice(::rustyray::__private::ACTOR_CLASSES)]
        #[linkme(crate = ::rustyray::__private::linkme)]
        static #class_entry: ::rustyray::__private::ActorEntry = ::rustyray::__private::ActorEntry {
            name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#class)),
            construct: #ctor_fn,
            is_async: #is_async,
            options: #declared,
        };

        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #ctor_fn(
            mut args: ::rustyray::ArgList,
        ) -> ::core::result::Result<::rustyray::__private::Instance, ::rustyray::__private::InvokeError> {
            args.expect_len(#cn)?;
            #ctake_args
            #make
        }

        #(#generated)*

        impl ::rustyray::ActorClass for #class {
            type Stub = #stub;
            fn entry() -> &'static ::rustyray::__private::ActorEntry {
                &#class_entry
            }
        }

        impl #stub {
            #(#stubs)*
        }

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone)]
        pub struct #options_ty(::rustyray::ActorOptions);

        impl ::rustyray::ActorOptionsBuilder for #options_ty {
            fn actor_options(&mut self) -> &mut ::rustyray::ActorOptions {
                &mut self.0
            }
        }

        impl #options_ty {
            /// Creates the actor with these options.
            #[allow(clippy::too_many_arguments)]
            pub fn remote(
                &self,
                ray: &::rustyray::Ray,
                #( #cnames: impl ::rustyray::IntoArg<#ctypes> ),*
            ) -> ::rustyray::Result<::rustyray::ActorHandle<#class>> {
                let args = ::std::vec![#( ::rustyray::IntoArg::<#ctypes>::into_arg(#cnames, ray)? ),*];
                ::rustyray::create_actor::<#class>(ray, &self.0, args)
            }
        }

        impl #class {
            /// Creates the actor; constructor arguments may be values or
            /// `ObjectRef`s.
            #[allow(clippy::too_many_arguments)]
            pub fn remote(
                ray: &::rustyray::Ray,
                #( #cnames: impl ::rustyray::IntoArg<#ctypes> ),*
            ) -> ::rustyray::Result<::rustyray::ActorHandle<#class>> {
                Self::options().remote(ray, #(#cnames),*)
            }

            /// Creation options (`name`, `max_restarts`, `max_concurrency`, ...).
            pub fn options() -> #options_ty {
                #options_ty(::core::default::Default::default())
            }
        }
    })
}
