//! The PCI address newtype: validated once at the edge, then trusted
//! everywhere (it is the only thing ever joined into a sysfs path).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address `DDDD:BB:DD.F`, stored normalised (lower-case hex).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    domain: u16,
    bus: u8,
    device: u8,
    function: u8,
}

/// Text that is not `DDDD:BB:DD.F` in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: expected DDDD:BB:DD.F in hex, e.g. 0000:a2:00.0")]
pub struct InvalidPciAddress {
    /// What was given, for the message.
    pub input: String,
}

impl PciAddress {
    /// `None` when `device` is 32 or more or `function` 8 or more: PCI has 5
    /// and 3 bits for them.
    pub fn new(domain: u16, bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// The conventional `pci-0000-a2-00-0` default device name.
    pub fn default_name(&self) -> String {
        format!(
            "pci-{:04x}-{:02x}-{:02x}-{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

fn hex_field(s: &str, width: usize) -> Option<u32> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddress {
    type Err = InvalidPciAddress;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || InvalidPciAddress {
            input: input.chars().take(64).collect(),
        };
        let (domain, rest) = input.split_once(':').ok_or_else(err)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(err)?;
        let (device, function) = rest.split_once('.').ok_or_else(err)?;
        let domain = hex_field(domain, 4).ok_or_else(err)?;
        let bus = hex_field(bus, 2).ok_or_else(err)?;
        let device = hex_field(device, 2).ok_or_else(err)?;
        let function = hex_field(function, 1).ok_or_else(err)?;
        PciAddress::new(domain as u16, bus as u8, device as u8, function as u8).ok_or_else(err)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl fmt::Debug for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises_case() {
        let a: PciAddress = "0000:A2:00.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:a2:00.0");
        assert_eq!(a.default_name(), "pci-0000-a2-00-0");
        let b: PciAddress = "ffff:ff:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "ffff:ff:1f.7");
    }

    #[test]
    fn rejects_malformed_and_path_tricks() {
        for bad in [
            "",
            "0000:a2:00",
            "a2:00.0",
            "0000:a2:00.8",
            "0000:a2:20.0",
            "0000:a2:00.0 ",
            "0000:a2:00.0/../../",
            "../../../etc",
            "000g:00:00.0",
            "+000:00:00.0",
            "0000:a2:0.0",
            "00000:a2:00.0",
            "0000:a2:00.0\n",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let a: PciAddress = serde_json::from_str("\"0000:01:00.1\"").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"0000:01:00.1\"");
        assert!(serde_json::from_str::<PciAddress>("\"nope\"").is_err());
    }
}
