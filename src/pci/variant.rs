//! Vendor-specific vfio variant drivers (`mlx5_vfio_pci`,
//! `nvgrace_gpu_vfio_pci`, ...), found the way the kernel documents for
//! userspace: modules declare `vfio_pci:` aliases in `modules.alias`, in
//! the same format as a device's `pci:` modalias. A device whose modalias
//! matches a variant's alias is bound to that driver instead of plain
//! vfio-pci. The generic `vfio_pci` module's catch-all alias never counts.

use std::path::Path;

use super::VFIO_PCI_MODULE;

/// The `vfio_pci:` aliases of `modules.alias`: which vendor variant vfio
/// drivers claim which devices.
#[derive(Debug, Default, Clone)]
pub struct VfioAliases {
    /// (pattern after `vfio_pci:`, module name)
    entries: Vec<(String, String)>,
}

impl VfioAliases {
    /// Reads `modules.alias` under `modules_dir`; empty if absent.
    pub fn load(modules_dir: &Path) -> VfioAliases {
        std::fs::read_to_string(modules_dir.join("modules.alias"))
            .map(|text| VfioAliases::parse(&text))
            .unwrap_or_default()
    }

    /// Parses `modules.alias` text; lines that are not `vfio_pci:` aliases are
    /// ignored.
    pub fn parse(text: &str) -> VfioAliases {
        let entries = text
            .lines()
            .filter_map(|line| {
                let rest = line
                    .strip_prefix("alias ")?
                    .strip_prefix(VFIO_PCI_MODULE)?
                    .strip_prefix(':')?;
                let (pattern, module) = rest.split_once(' ')?;
                let module = module.trim();
                (module != VFIO_PCI_MODULE).then(|| (pattern.to_owned(), module.to_owned()))
            })
            .collect();
        VfioAliases { entries }
    }

    /// The variant module for a device's modalias (`pci:v...`), preferring
    /// the most specific pattern (fewest wildcards).
    pub fn variant_for(&self, modalias: &str) -> Option<&str> {
        let id = modalias.strip_prefix("pci:")?;
        self.entries
            .iter()
            .filter(|(pattern, _)| glob_match(pattern.as_bytes(), id.as_bytes()))
            .min_by_key(|(pattern, _)| pattern.bytes().filter(|&b| b == b'*').count())
            .map(|(_, module)| module.as_str())
    }
}

/// `fnmatch` with `*` and `?`, which is all modules.alias uses.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIASES: &str = "\
alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
";

    #[test]
    fn finds_the_variant_and_ignores_the_generic_alias() {
        let a = VfioAliases::parse(ALIASES);
        assert_eq!(
            a.variant_for("pci:v000010DEd00002342sv000010DEsd000016EBbc03sc02i00"),
            Some("nvgrace_gpu_vfio_pci")
        );
        assert_eq!(
            a.variant_for("pci:v000015B3d0000101Esv0000sd0000bc02sc00i00"),
            Some("mlx5_vfio_pci")
        );
        assert_eq!(
            a.variant_for("pci:v000010DEd00002236sv000010DEsd00001482bc03sc02i00"),
            None
        );
        assert_eq!(a.variant_for("garbage"), None);
    }

    #[test]
    fn glob() {
        assert!(glob_match(b"v*d*", b"v1d2"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(!glob_match(b"v1*", b"v2"));
    }
}
