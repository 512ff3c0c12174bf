//! The roles, and what each lets its principal (an authenticated caller)
//! write and read.

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
};

use clap::ValueEnum;
use uuid::Uuid;

use super::{AuthError, denied};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Role {
    Device,
    Gateway,
    Reader,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Gateway => "gateway",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }

    pub(super) fn from_str_opt(s: &str) -> Option<Self> {
        Some(match s {
            "device" => Role::Device,
            "gateway" => Role::Gateway,
            "reader" => Role::Reader,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None` only when authentication is off.
    pub token_id: Option<Uuid>,
    pub name: String,
    pub role: Role,
    /// `None` for admin: every app_source.
    pub app_source: Option<String>,
    pub devices: HashSet<Uuid>,
}

/// The caller when authentication is off: may do anything.
pub(super) static ANONYMOUS: LazyLock<Arc<Principal>> = LazyLock::new(|| {
    Arc::new(Principal {
        token_id: None,
        name: "anonymous (authentication off)".into(),
        role: Role::Admin,
        app_source: None,
        devices: HashSet::new(),
    })
});

impl Principal {
    /// Refuses a call that writes, for a role that may not.
    pub fn require_write(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Device | Role::Gateway | Role::Admin => Ok(()),
            Role::Reader => Err(denied(format!(
                "token {:?} is a reader: it may not write points",
                self.name
            ))),
        }
    }

    /// Refuses a call that reads, for a role that may not.
    pub fn require_read(&self) -> Result<(), AuthError> {
        match self.role {
            Role::Reader | Role::Admin => Ok(()),
            Role::Device | Role::Gateway => Err(denied(format!(
                "token {:?} is a {}: it may not query; use a reader token",
                self.name, self.role
            ))),
        }
    }

    /// Why this principal may not write a point of `device` for `app`, if it may not.
    pub fn forbids(&self, device: &Uuid, app: &str) -> Option<String> {
        let own_app = || self.app_source.as_deref() == Some(app);
        match self.role {
            Role::Admin => None,
            Role::Gateway if own_app() => None,
            Role::Device if own_app() && self.devices.contains(device) => None,
            Role::Device if own_app() => Some(format!(
                "this token may not write for device {device}: it covers only its own devices"
            )),
            Role::Gateway | Role::Device => Some(format!(
                "this token is bound to app_source {:?}, not {app:?}",
                self.app_source.as_deref().unwrap_or_default()
            )),
            Role::Reader => Some("a reader token may not write".into()),
        }
    }

    /// The app_source that this principal's reads are confined to; `None`: all.
    pub fn read_scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            _ => Some(self.app_source.as_deref().unwrap_or_default()),
        }
    }

    /// Refuses a read of `app`'s data outside this principal's scope.
    pub fn require_app(&self, app: &str) -> Result<(), AuthError> {
        match self.read_scope() {
            Some(own) if own != app => Err(denied(format!(
                "this token reads app_source {own:?} only, not {app:?}"
            ))),
            _ => Ok(()),
        }
    }
}
