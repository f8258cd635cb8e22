//! Closed vocabularies of metric label values.
//!
//! [`label_enum!`](crate::label_enum) defines an enum whose variants are the
//! values a metric label may take: `label()` gives the exact string the metric
//! exports (a `&'static str`, so counting allocates nothing) and `ALL` lists every
//! variant, which `gateway/tests/metric_labels.rs` checks against
//! `docs/metrics.md`. Open values (service names, trust domains, addresses)
//! stay strings.

/// Defines a metric label vocabulary:
///
/// ```
/// isthmus_federation::label_enum! {
///     /// The `result` label of `isthmus_example_total`.
///     pub enum Outcome {
///         /// It worked.
///         Ok => "ok",
///         /// It did not.
///         Failed => "failed",
///     }
/// }
/// assert_eq!(Outcome::Failed.label(), "failed");
/// assert_eq!(Outcome::ALL.len(), 2);
/// ```
#[macro_export]
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident => $label:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $(
                $(#[$vmeta])*
                $variant,
            )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The label value the metric exports.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }
        }
    };
}
