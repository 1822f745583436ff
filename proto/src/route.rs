//! SQ's routes, `/api/v2/<route>`, in one table.
//!
//! Everything that names a route (the parser, metering labels, the node's metrics, the gateway's
//! table of served paths) reads it from [`Route`], so adding a route is one line in the table
//! below plus the arm that parses its parameters (the compiler asks for that arm).

use serde::{Deserialize, Serialize};

/// Declares [`Route`] from one table: variant, path segment, whether it answers `GET`, and
/// whether it answers `POST` (with its text argument in the body), as SQ 0.6.0 routes each.
macro_rules! routes {
    ($($(#[$doc:meta])* $variant:ident = $name:literal, get: $get:literal, post: $post:literal;)*) => {
        /// One of SQ's routes, the path segment after `/api/v2/`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Route {
            $($(#[$doc])* $variant,)*
        }

        impl Route {
            /// Every route, in the table's order.
            pub const ALL: &'static [Route] = &[$(Route::$variant,)*];

            /// The path segment after `/api/v2/`; also the route's label in metrics and logs.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Route::$variant => $name,)*
                }
            }

            /// True when the route answers `GET`.
            pub const fn takes_get(self) -> bool {
                match self {
                    $(Route::$variant => $get,)*
                }
            }

            /// True when the route answers `POST`, reading its text argument from the body.
            pub const fn takes_post(self) -> bool {
                match self {
                    $(Route::$variant => $post,)*
                }
            }
        }
    };
}

routes! {
    /// The SQ API version this service speaks.
    Version = "version", get: true, post: false;
    Select = "select", get: true, post: false;
    Insert = "insert", get: true, post: true;
    Update = "update", get: true, post: true;
    Delete = "delete", get: true, post: false;
    Toc = "toc", get: true, post: false;
    Get = "get", get: true, post: false;
    Checksum = "checksum", get: true, post: false;
    Delta = "delta", get: true, post: true;
    Query = "query", get: true, post: true;
    /// The tenant's view of a document: its name, size and scroll count (SQ: `Hosting: <path>`).
    Status = "status", get: true, post: false;
    /// Loads a document (SQ: re-reads it from disk); answers `Loaded <name>.phext`.
    Load = "load", get: true, post: false;
    /// Every scroll of a document as SQ's JSON lines.
    JsonExport = "json-export", get: true, post: false;
    /// The coordinate SQ would infer for a text (`algo=xor|checksum`, `limit`); `POST` only.
    Where = "where", get: false, post: true;
}

impl Route {
    /// The route a path segment names, if any.
    pub fn parse(segment: &str) -> Option<Route> {
        Route::ALL.iter().copied().find(|r| r.name() == segment)
    }

    /// The path the route is served at, `/api/v2/<name>`.
    pub fn path(self) -> String {
        format!("/api/v2/{}", self.name())
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    // Goal: every route's name parses back to it, names are distinct, and other segments are not
    // routes.
    #[test]
    fn names_round_trip() {
        for &r in Route::ALL {
            assert_eq!(Route::parse(r.name()), Some(r), "{r}");
        }
        let mut names: Vec<&str> = Route::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Route::ALL.len(), "route names are distinct");
        for other in ["", "Select", "select/", "admin", "metrics", "openapi.json", "nosuch"] {
            assert_eq!(Route::parse(other), None, "{other:?}");
        }
        assert_eq!(Route::Query.path(), "/api/v2/query");
    }
}
